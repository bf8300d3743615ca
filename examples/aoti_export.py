"""C++ serving without Python (SPEC "Deployment"), the Python half: a small model with msda's ops,
torch.export-ed and compiled by AOTInductor into a .pt2 package that libtorch loads with
torch::inductor::AOTIModelPackageLoader (examples/aoti_run.cpp runs it with msda's op library
loaded and checks it against the eager outputs written here).

    python examples/aoti_export.py OUT_DIR

writes OUT_DIR/model.pt2 and OUT_DIR/cases.pt: a list of {"inputs": [...], "outputs": [...]}
(the package's flattened inputs and the eager model's outputs, f32), one case per batch size,
saved with torch.save, which libtorch reads with torch::pickle_load. The batch is a dynamic
dimension of the export, so one package serves every case.

The model calls both op schemas with every option (they reach the compiled model as the
arguments of a proxy-executor call, serialized with the package):
- msda::ms_deform_attn_fused as MSDeformAttn calls it (defaults: points=None,
  sampling="bilinear", offset_scale=0.5),
- msda::ms_deform_attn as MSDeformAttn(kernel="msda-unfused") calls it (im2col_step=64),
- msda::ms_deform_attn with points=[3, 1] and sampling="discrete" (the v2 attention of RT-DETRv2
  and D-FINE: locations [N, Q, M, K, 2], weights [N, Q, M, K]),
- msda::ms_deform_attn_fused with points=[3, 1], box reference points and offset_scale=0.75.
"""
import argparse
import os
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import msda

LEVELS = ((8, 8), (4, 4))  # (H, W) per level
D_MODEL, HEADS, POINTS, QUERIES, CLASSES = 32, 4, 2, 10, 5
POINTS_V2 = [3, 1]  # points per level of the v2 attention
BATCHES = (2, 1, 3)  # the first one traces the export; every one is a test case


class TinyDetector(nn.Module):
    """A decoder layer's worth of deformable attention over a 2-level feature map, and heads."""

    def __init__(self):
        super().__init__()
        self.attn = msda.MSDeformAttn(D_MODEL, len(LEVELS), HEADS, POINTS)  # the fused op
        self.attn_unfused = msda.MSDeformAttn(D_MODEL, len(LEVELS), HEADS, POINTS)
        self.attn_unfused.kernel = "msda-unfused"  # the plain op, im2col_step=64
        k = sum(POINTS_V2)
        self.value_proj = nn.Linear(D_MODEL, D_MODEL)
        self.v2_offsets = nn.Linear(D_MODEL, HEADS * k * 2)
        self.v2_logits = nn.Linear(D_MODEL, HEADS * k)
        self.class_head = nn.Linear(D_MODEL, CLASSES)
        self.box_head = nn.Linear(D_MODEL, 4)
        with torch.no_grad():  # offsets and weights that are not all zero, so every sample counts
            for layer in (self.attn.sampling_offsets, self.attn.attention_weights, self.attn_unfused.sampling_offsets,
                          self.attn_unfused.attention_weights, self.v2_offsets, self.v2_logits):
                layer.weight.normal_(0.0, 0.1)

    def forward(self, query, reference_points, boxes, memory, spatial_shapes, level_start_index):
        """query [N, Q, C]; reference_points [N, Q, L, 2]; boxes [N, Q, 4] (cx, cy, w, h) in 0..1;
        memory [N, S, C]; spatial_shapes [L, 2]; level_start_index [L]. Returns class logits
        [N, Q, CLASSES] and boxes [N, Q, 4]."""
        n, q, _ = query.shape
        s = memory.shape[1]
        k = sum(POINTS_V2)
        x = query + self.attn(query, reference_points, memory, spatial_shapes, level_start_index)
        x = x + self.attn_unfused(x, reference_points, memory, spatial_shapes, level_start_index)

        # The v2 attention (points per level): locations from the boxes, the plain op, discrete.
        value = self.value_proj(memory).view(n, s, HEADS, D_MODEL // HEADS)
        offsets = self.v2_offsets(x).view(n, q, HEADS, k, 2)
        logits = self.v2_logits(x).view(n, q, HEADS, k)
        centre, size = boxes[:, :, None, None, :2], boxes[:, :, None, None, 2:]
        locations = centre + offsets.tanh() * size * 0.5
        weights = F.softmax(logits, -1)
        x = x + msda.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights,
                                    points=POINTS_V2, sampling="discrete")
        # The same through the fused op: box reference points per level, offset_scale.
        box_refs = boxes[:, :, None, :].expand(n, q, len(LEVELS), 4)
        x = x + msda.ms_deform_attn_fused(value, spatial_shapes, level_start_index, box_refs, offsets, logits,
                                          points=POINTS_V2, sampling="bilinear", offset_scale=0.75)
        return self.class_head(x), self.box_head(x).sigmoid()


def example_inputs(batch: int, generator: torch.Generator):
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s = int(areas.sum())
    query = torch.randn(batch, QUERIES, D_MODEL, generator=generator)
    reference_points = torch.rand(batch, QUERIES, len(LEVELS), 2, generator=generator)
    centre = torch.rand(batch, QUERIES, 2, generator=generator) * 0.8 + 0.1
    size = torch.rand(batch, QUERIES, 2, generator=generator) * 0.3 + 0.05
    memory = torch.randn(batch, s, D_MODEL, generator=generator)
    return (query, reference_points, torch.cat([centre, size], -1), memory, shapes, starts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where model.pt2 and cases.pt go")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = TinyDetector().eval()
    cases = [example_inputs(b, generator) for b in BATCHES]

    started = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic_shapes = ({0: batch}, {0: batch}, {0: batch}, {0: batch}, None, None)
    with torch.no_grad():
        program = torch.export.export(model, cases[0], dynamic_shapes=dynamic_shapes)
    targets = sorted({str(node.target) for node in program.graph.nodes
                      if node.op == "call_function" and str(node.target).startswith("msda.")})
    print(f"exported in {time.perf_counter() - started:.1f} s; msda ops in the graph: {', '.join(targets)}")
    if targets != ["msda.ms_deform_attn.default", "msda.ms_deform_attn_fused.default"]:
        sys.exit(f"FAIL: expected both msda ops in the exported graph, got {targets}")

    started = time.perf_counter()
    package = os.path.join(args.out_dir, "model.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=package)
    print(f"compiled {package} in {time.perf_counter() - started:.1f} s")

    # Eager outputs, and the package run from Python as a first check (the C++ program is the real one).
    compiled = torch._inductor.aoti_load_package(package)
    saved = []
    with torch.no_grad():
        for inputs in cases:
            expected = model(*inputs)
            got = compiled(*inputs)
            for e, g in zip(expected, got):
                err = ((g - e).abs().max() / e.abs().max()).item()
                if not err <= 1e-5:
                    sys.exit(f"FAIL: the package run from Python differs from eager: max rel error {err:.2e}")
            saved.append({"inputs": [t.contiguous().clone() for t in inputs],
                          "outputs": [t.contiguous().clone() for t in expected]})
    torch.save(saved, os.path.join(args.out_dir, "cases.pt"))
    print(f"wrote {len(saved)} cases (batch {', '.join(map(str, BATCHES))}) to {args.out_dir}/cases.pt")


if __name__ == "__main__":
    main()
