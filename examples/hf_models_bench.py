"""Whole Hugging Face transformers models on the CPU: their own MSDA path against msda.patch.

For each model: one instance built from a config with random weights (nothing is downloaded),
and a deep copy of it patched with msda.patch; the same inputs go through both, in one run:
- forward: eval mode, torch.no_grad();
- forward+backward: train mode, forward, then backward of the sum of the means of every
  floating-point output (no labels, so no matching and no loss heads: the model's own compute).
Each is the median of --repeats timed runs after one warm-up, the two paths alternating run by
run so that a drift of the machine hits both alike. Before timing, the eval outputs of the two
paths are compared (the "max rel diff" column: the largest ||msda - transformers|| / ||transformers||
over the floating-point outputs); the exit status is 1 when it exceeds 1e-4.

The models keep their published encoder/decoder sizes, with a small ResNet backbone in place of
ResNet-50 / Swin (a real backbone on 2 cores would take most of the time and hide what changed),
at image sizes whose feature pyramid is the published one:
- Deformable DETR: d_model 256, 8 heads, 4 levels, 4 points, 6 encoder + 6 decoder layers,
  300 queries, FFN 1024; an 800x1066 image: levels 100x134, 50x67, 25x34, 13x17 (S = 17821).
- RT-DETR (R50 sizes): d_model 256, 8 heads, 3 levels, 4 points, 1 AIFI encoder layer, 6 decoder
  layers, 300 queries, FFN 1024 (MSDA is in the decoder only); 640x640: levels 80x80, 40x40, 20x20.
- RT-DETRv2: the same sizes, the v2 attention (transformers' multi_scale_deformable_attention_v2),
  bilinear ("default") and "discrete" sampling.
- D-FINE: the same sizes with points [3, 6, 3] per level (D-FINE-L's decoder; the published
  model's HGNetv2 backbone is replaced by the small ResNet as for the others).
- Mask2Former: pixel decoder of 6 MSDA encoder layers (d 256, 8 heads, 3 levels, 4 points,
  FFN 1024), 9 masked-attention decoder layers, 100 queries; 1024x1024: levels 128x128, 64x64,
  32x32 (S = 21504), mask features 256x256.
- Grounding DINO: d_model 256, 8 heads, 4 levels, 4 points, 6 + 6 layers, 900 queries, FFN 2048,
  a 2-layer text encoder of width 256 (BERT-base in the published model), 8 text tokens;
  800x1066 as Deformable DETR.
The backbone: transformers' ResNetConfig with basic blocks, one per stage, widths 32/64/128/256,
stem 32 (the other path's cost is the same in both columns).

--quick builds tiny versions of the same models (d_model 32, 2 heads, 1-2 layers, 64x80 images)
and times one run each: a smoke test of seconds that still checks the outputs agree. Exit status:
0, 1 when outputs disagree, 77 when transformers is not installed.

    PYTHONPATH=build/python .venv/bin/python examples/hf_models_bench.py
    PYTHONPATH=build/python .venv/bin/python examples/hf_models_bench.py --models deformable-detr --repeats 5
    PYTHONPATH=build/python .venv/bin/python examples/hf_models_bench.py --quick
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

import msda
from msda.bench import cpu_model


def _resnet(transformers, quick, stages, config_class=None):
    config_class = config_class or transformers.ResNetConfig
    if quick:
        return config_class(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=stages)
    return config_class(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                        layer_type="basic", out_features=stages)


def _image(n, h, w, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def deformable_detr(transformers, quick, batch):
    d, heads, enc, dec, queries, ffn, (h, w) = ((32, 2, 1, 2, 10, 32, (64, 80)) if quick
                                                 else (256, 8, 6, 6, 300, 1024, (800, 1066)))
    config = transformers.DeformableDetrConfig(
        backbone_config=_resnet(transformers, quick, ["stage2", "stage3", "stage4"]), use_pretrained_backbone=False,
        d_model=d, encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_layers=enc,
        decoder_layers=dec, num_queries=queries, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, num_feature_levels=4,
        encoder_n_points=4, decoder_n_points=4, num_labels=91)
    model = transformers.DeformableDetrForObjectDetection(config)
    summary = f"d {d}, {heads} heads, 4 levels, 4 points, {enc}+{dec} layers, {queries} queries, {h}x{w}"
    return model, dict(pixel_values=_image(batch, h, w), pixel_mask=torch.ones(batch, h, w, dtype=torch.long)), summary


def _rt_detr_family(transformers, quick, batch, family, points, note="", **extra):
    """RT-DETR and the detectors built on it (RT-DETRv2, D-FINE): the same sizes, the family's
    config and model class (transformers.<family>Config, <family>ForObjectDetection)."""
    d, heads, dec, queries, ffn, size = (32, 2, 2, 10, 32, 64) if quick else (256, 8, 6, 300, 1024, 640)
    backbone = _resnet(transformers, quick, ["stage2", "stage3", "stage4"], transformers.RTDetrResNetConfig)
    config = getattr(transformers, f"{family}Config")(
        backbone_config=backbone, encoder_in_channels=backbone.hidden_sizes[1:], d_model=d, encoder_hidden_dim=d,
        decoder_in_channels=[d] * 3, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, encoder_attention_heads=heads,
        decoder_attention_heads=heads, decoder_layers=dec, num_queries=queries, num_feature_levels=3,
        decoder_n_points=points, num_denoising=0, num_labels=80, **extra)
    model = getattr(transformers, f"{family}ForObjectDetection")(config)
    point_text = f"{points} points" if isinstance(points, int) else f"points {points}"
    summary = f"d {d}, {heads} heads, 3 levels, {point_text}{note}, 1+{dec} layers, {queries} queries, {size}x{size}"
    return model, dict(pixel_values=_image(batch, size, size)), summary


def rt_detr(transformers, quick, batch):
    return _rt_detr_family(transformers, quick, batch, "RTDetr", 4)


def rt_detr_v2(transformers, quick, batch, method="default"):
    return _rt_detr_family(transformers, quick, batch, "RTDetrV2", 4, f", {method} sampling", decoder_method=method)


def rt_detr_v2_discrete(transformers, quick, batch):
    return rt_detr_v2(transformers, quick, batch, method="discrete")


def d_fine(transformers, quick, batch):
    return _rt_detr_family(transformers, quick, batch, "DFine", [3, 6, 3])


def mask2former(transformers, quick, batch):
    d, heads, enc, dec, queries, ffn, size = ((32, 2, 2, 2, 10, 32, 64) if quick
                                               else (256, 8, 6, 10, 100, 1024, 1024))
    config = transformers.Mask2FormerConfig(
        backbone_config=_resnet(transformers, quick, ["stage1", "stage2", "stage3", "stage4"]), feature_size=d,
        mask_feature_size=d, hidden_dim=d, encoder_feedforward_dim=ffn, encoder_layers=enc, decoder_layers=dec,
        num_attention_heads=heads, dim_feedforward=8 * d, num_queries=queries, num_labels=133)
    model = transformers.Mask2FormerForUniversalSegmentation(config)
    summary = (f"d {d}, {heads} heads, 3 levels, 4 points, {enc} MSDA + {dec - 1} decoder layers, "
               f"{queries} queries, {size}x{size}")
    return model, dict(pixel_values=_image(batch, size, size)), summary


def grounding_dino(transformers, quick, batch):
    d, heads, enc, dec, queries, ffn, (h, w) = ((32, 2, 1, 2, 10, 32, (64, 80)) if quick
                                                 else (256, 8, 6, 6, 900, 2048, (800, 1066)))
    text = transformers.BertConfig(vocab_size=1000, hidden_size=d, num_hidden_layers=1 if quick else 2,
                                   num_attention_heads=heads, intermediate_size=4 * d, max_position_embeddings=64)
    config = transformers.GroundingDinoConfig(
        backbone_config=_resnet(transformers, quick, ["stage2", "stage3", "stage4"]), text_config=text, d_model=d,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_layers=enc, decoder_layers=dec,
        num_queries=queries, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, num_feature_levels=4, encoder_n_points=4,
        decoder_n_points=4, max_text_len=16)
    model = transformers.GroundingDinoForObjectDetection(config)
    ids = torch.randint(1, 1000, (batch, 8), generator=torch.Generator().manual_seed(1))
    inputs = dict(pixel_values=_image(batch, h, w), pixel_mask=torch.ones(batch, h, w, dtype=torch.long),
                  input_ids=ids, attention_mask=torch.ones_like(ids))
    summary = f"d {d}, {heads} heads, 4 levels, 4 points, {enc}+{dec} layers, {queries} queries, {h}x{w}"
    return model, inputs, summary


MODELS = {
    "deformable-detr": ("Deformable DETR", deformable_detr),
    "rt-detr": ("RT-DETR", rt_detr),
    "rt-detr-v2": ("RT-DETRv2", rt_detr_v2),
    "rt-detr-v2-discrete": ("RT-DETRv2 (discrete)", rt_detr_v2_discrete),
    "d-fine": ("D-FINE", d_fine),
    "mask2former": ("Mask2Former", mask2former),
    "grounding-dino": ("Grounding DINO", grounding_dino),
}


def _float_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _float_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _float_tensors(v)]
    return []


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def _forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = 0
    for t in _float_tensors(model(**inputs)):
        if t.requires_grad:
            # Masked logits are -inf: only the finite entries make the loss.
            loss = loss + torch.where(torch.isfinite(t), t, torch.zeros_like(t)).mean()
    loss.backward()


def _max_rel_diff(a, b):
    worst = 0.0
    for x, y in zip(_float_tensors(a), _float_tensors(b)):
        keep = torch.isfinite(x) & (x.abs() < 1e30)
        if not torch.equal(keep, torch.isfinite(y) & (y.abs() < 1e30)):
            return float("inf")
        x, y = x[keep].double(), y[keep].double()
        norm = x.norm().item()
        diff = (x - y).norm().item()
        worst = max(worst, diff / norm if norm > 0 else diff)
    return worst


def _timed_medians(fns, repeats):
    """Median seconds of each fn, one warm-up each, then the fns alternating run by run."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench_model(key, args, transformers):
    label, build = MODELS[key]
    torch.manual_seed(0)
    reference, inputs, summary = build(transformers, args.quick, args.batch)
    patched = copy.deepcopy(reference)
    replaced = msda.patch(patched)
    reference.eval()
    patched.eval()
    diff = _max_rel_diff(_forward(reference, inputs), _forward(patched, inputs))
    rows = []
    fwd = _timed_medians([lambda: _forward(reference, inputs), lambda: _forward(patched, inputs)], args.repeats)
    rows.append((label, summary, "forward", *fwd, diff))
    reference.train()
    patched.train()
    fb = _timed_medians([lambda: _forward_backward(reference, inputs), lambda: _forward_backward(patched, inputs)],
                        args.repeats)
    rows.append((label, summary, "forward+backward", *fb, diff))
    print(f"{label}: {replaced} attention kernels patched; forward {fwd[0] * 1e3:.0f} -> {fwd[1] * 1e3:.0f} ms, "
          f"forward+backward {fb[0] * 1e3:.0f} -> {fb[1] * 1e3:.0f} ms", file=sys.stderr)
    return rows


def format_table(rows):
    lines = ["| model | config | pass | transformers ms | msda ms | speedup | max rel diff |",
             "|---|---|---|---:|---:|---:|---:|"]
    for label, summary, pass_name, ref_s, msda_s, diff in rows:
        lines.append(f"| {label} | {summary} | {pass_name} | {ref_s * 1e3:.0f} | {msda_s * 1e3:.0f} | "
                     f"**{ref_s / msda_s:.2f}x** | {diff:.0e} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="hf_models_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and pass (median reported)")
    parser.add_argument("--batch", type=int, default=1, help="images per batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch.get_num_threads())")
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 repeat: a smoke test of seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        # 77: the exit status CTest's SKIP_RETURN_CODE can name, so a smoke test skips without it.
        print("hf_models_bench.py: needs transformers (pip install 'transformers>=4.50')", file=sys.stderr)
        return 77
    import logging
    transformers.logging.set_verbosity_error()  # the ResNet-backbone notice of Mask2Former
    logging.getLogger("transformers").setLevel(logging.ERROR)

    print(f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, float32, batch {args.batch}, median of {args.repeats}"
          + (" (--quick: tiny models)" if args.quick else ""))
    rows = []
    for key in args.models:
        rows += bench_model(key, args, transformers)
    print()
    print(format_table(rows))
    bad = sorted({r[0] for r in rows if not r[5] <= 1e-4})
    if bad:
        print(f"hf_models_bench.py: msda's outputs differ from transformers' beyond 1e-4 in {', '.join(bad)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
