"""A small Deformable-DETR-style detector trained end to end on the CPU with msda.

The task is synthetic and generated on the fly (nothing is downloaded): 3x128x128 images of 1-4
axis-aligned rectangles and discs in random colours on a noisy background; the targets are the
boxes (cx, cy, w, h, normalised to 0..1) and the classes (0 rectangle, 1 disc).

The model is Deformable DETR in miniature:
- a CNN backbone (GroupNorm, no BatchNorm, so that the loss of a batch is the mean of the
  per-image losses, which distributed training relies on) giving a 4-level pyramid with strides
  8/16/32/64 (16x16, 8x8, 4x4, 2x2 for a 128x128 image: S = 340 tokens per image);
- 1x1 input projections to d_model, a learned level embedding and sine positional encodings;
- a 6-layer encoder of msda.MSDeformAttn + FFN: every pixel of every level is a query, its
  reference point the centre of its pixel (2 coordinates);
- a 3-layer decoder with 20 learned queries: self-attention (nn.MultiheadAttention), then
  MSDeformAttn cross-attention around a reference point given by a Linear on the query embedding
  (sigmoid), then an FFN;
- class (2 classes + no-object) and box heads on every decoder layer, a Hungarian matching per
  image and layer (scipy's linear_sum_assignment when scipy is installed, else the small exact
  Hungarian below), and the loss: cross-entropy with a down-weighted no-object class + 5 x L1 +
  2 x (1 - GIoU), averaged over the images of the batch (and summed over the decoder layers).

The attention path is chosen by setting `kernel` on every MSDeformAttn module:
  --attention msda      msda's op (the default)
  --attention pytorch   the grid-sample formulation (msda.ms_deform_attn_pytorch)
  --attention noop      the op replaced by a no-op of the same shape (see DeformAttn): all the
                        module's projections run, forward and backward, only the sampling is
                        gone, so the step time is the floor, the step with a free kernel (its
                        loss curve is of course a different one).
torch.manual_seed(seed) runs before the model is built and every batch comes from a generator
seeded by (seed, step), so runs with the same seed see the same weights and the same batches:
msda and pytorch must give the same loss curve up to rounding.

Measured on the 2-core development machine (AMD EPYC, Debian 12, torch 1.13 with OpenBLAS,
--threads 2, float32, the defaults: batch 8, 128x128, d_model 64, 8 heads, 4 points, 6 encoder and
3 decoder layers, 20 queries), `--compare` (30 steps of each in lockstep, 18 s in all):
    median step   msda 0.173 s   pytorch 0.280 s   noop 0.128 s
    / noop        msda 1.35      pytorch 2.19
  i.e. msda's step is 1.6x faster, and the attention's cost above the floor is 0.045 s with msda
  against 0.152 s with grid-sample (3.4x). The loss curves agree: identical at step 0, max |diff|
  7.9e-4 (relative 6.4e-5) over the 30 steps (see compare() on why they are not bitwise equal).
  Training with msda, seed 0, 300 steps (57 s, median step 0.179 s): loss 13.24 at step 0,
  mean over steps 0-29 12.31, 90-119 8.44, 180-209 7.38, 270-299 6.38 (the L1 part 0.91 -> 0.43,
  the GIoU part 2.40 -> 1.23, the class part 2.98 -> 1.79; each summed over the 3 decoder layers).
  Distributed, 2 ranks of 1 thread each (torchrun, below): 0.142 s a step, the same losses.

Examples (from the repository root, with msda installed in .venv by scripts/setup.sh):
  .venv/bin/python examples/train_detector.py --steps 300 --log train.jsonl
  .venv/bin/python examples/train_detector.py --compare --plot train_compare.png
  .venv/bin/python examples/train_detector.py --dtype bfloat16 --steps 50
  .venv/bin/torchrun --nproc_per_node=2 examples/train_detector.py --ddp --steps 100

(or, straight from a build: PYTHONPATH=build/python .venv/bin/python examples/train_detector.py ...)

Distributed (--ddp, under torchrun): torch.distributed with the gloo backend, the model wrapped in
DistributedDataParallel; the global batch (--batch) is generated identically on every rank from
(seed, step) and rank r takes the items r::world_size, so the data does not depend on the world
size, and since each rank's loss is the mean over its (equal-sized) shard and DDP averages the
gradients, the gradients equal those of the global batch in one process
(tests/python/test_ddp.py checks this).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

# PyPI's torch runs its Linear layers on MKL, inside torch's own threads. A torch built against
# the system's OpenBLAS (Debian's) has a second thread pool that torch.set_num_threads does not
# control and that oversubscribes the cores (measured with Debian's torch 1.13: 0.46 s a step
# instead of 0.18 s with 2 threads on 2 cores): keep OpenBLAS to one thread unless told otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
    # Several ranks on one machine: share the cores among them.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"]))))

import torch
import torch.nn.functional as F
from torch import nn

import msda

NUM_CLASSES = 2  # rectangle, disc; class index NUM_CLASSES is "no object"
CLASS_NAMES = ("rectangle", "disc")
ATTENTIONS = ("msda", "pytorch", "noop")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------
# Data


def make_batch(step, global_batch, seed, image_size=128, dtype=torch.float32):
    """The global batch of a step: (images [B, 3, H, W], targets), a list of B dicts with
    "labels" [T] (int64) and "boxes" [T, 4] (cx, cy, w, h in 0..1), 1 <= T <= 4.

    Depends only on (step, global_batch, seed, image_size): every rank builds the same batch
    and takes its shard (items rank::world_size)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    size = image_size
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    ys, xs = centres.view(-1, 1), centres.view(1, -1)
    images = torch.empty(global_batch, 3, size, size, dtype=torch.float64)
    targets = []
    for i in range(global_batch):
        img = (0.15 + 0.35 * torch.rand(3, 1, 1, generator=g, dtype=torch.float64)).expand(3, size, size).clone()
        count = int(torch.randint(1, 5, (1,), generator=g))
        labels, boxes = [], []
        for _ in range(count):
            cls = int(torch.randint(0, NUM_CLASSES, (1,), generator=g))
            u = torch.rand(5, generator=g, dtype=torch.float64).tolist()
            w = 0.1 + 0.3 * u[0]
            h = w if cls == 1 else 0.1 + 0.3 * u[1]
            cx = w / 2 + (1 - w) * u[2]
            cy = h / 2 + (1 - h) * u[3]
            if cls == 0:
                mask = ((xs - cx).abs() <= w / 2) & ((ys - cy).abs() <= h / 2)
            else:
                mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= (w / 2) ** 2
            colour = torch.rand(3, 1, 1, generator=g, dtype=torch.float64)
            img = torch.where(mask, colour, img)
            labels.append(cls)
            boxes.append([cx, cy, w, h])
        images[i] = img + 0.08 * torch.randn(3, size, size, generator=g, dtype=torch.float64)
        targets.append({"labels": torch.tensor(labels, dtype=torch.int64),
                        "boxes": torch.tensor(boxes, dtype=torch.float64)})
    images = (images - 0.5) / 0.3
    return images.to(dtype), [{"labels": t["labels"], "boxes": t["boxes"].to(dtype)} for t in targets]


def shard(images, targets, rank, world_size):
    """Rank r's share of a global batch: items r, r + world_size, ..."""
    return images[rank::world_size], targets[rank::world_size]


# ----------------------------------------------------------------------------------------------
# Model


class DeformAttn(msda.MSDeformAttn):
    """msda.MSDeformAttn plus kernel = "noop": everything the module computes (the value, offset,
    weight and output projections, the softmax, the sampling locations) with the sampling itself,
    msda.ms_deform_attn, replaced by a stand-in of the same shape that costs next to nothing:
    out[n, q, m, :] = sum(weights[n, q, m]) * mean over S of value[n, :, m, :] + sum(locations[n, q, m]).
    It reaches all three inputs, so every projection still gets its gradient (and its backward
    still runs): the step time of noop is the step's floor, what it would cost with a free kernel.
    (2-coordinate reference points, no padding mask: what this example uses.)"""

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        if self.kernel != "noop":
            return super().forward(query, reference_points, input_flatten, input_spatial_shapes,
                                   input_level_start_index, input_padding_mask)
        n, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape
        m, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).view(n, len_in, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, len_q, m, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(n, len_q, m, L * P), -1).view(n, len_q, m, L, P)
        normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = (weights.sum((-2, -1))[..., None] * value.mean(1, keepdim=True).to(weights.dtype)
               + locations.sum((-3, -2, -1))[..., None])
        return self.output_proj(out.to(value.dtype).flatten(2))


class _Float32Norm:
    """A norm layer that also runs under CPU autocast to bfloat16: torch 1.13 leaves group_norm and
    layer_norm out of the CPU autocast lists and their CPU kernels reject a bfloat16 input with
    float32 weights, so normalise in float32 and hand back the input's dtype."""

    def forward(self, x):
        if x.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(device_type="cpu", enabled=False):
                return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


class GroupNorm(_Float32Norm, nn.GroupNorm):
    pass


class LayerNorm(_Float32Norm, nn.LayerNorm):
    pass


def conv_block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), GroupNorm(8, cout), nn.ReLU(inplace=True))


class Backbone(nn.Module):
    """A small CNN: feature maps at strides 8, 16, 32 (and 64), for n_levels = 3 or 4."""

    def __init__(self, n_levels=4, width=32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv_block(3, w, 2), conv_block(w, 2 * w, 2), conv_block(2 * w, 2 * w, 2),
                                  conv_block(2 * w, 2 * w, 1))                       # stride 8
        chans = [2 * w, 4 * w, 4 * w, 4 * w][:n_levels]
        self.stages = nn.ModuleList(conv_block(chans[i - 1], chans[i], 2) for i in range(1, n_levels))
        self.channels = chans

    def forward(self, x):
        x = self.stem(x)
        feats = [x]
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def sine_position(h, w, d_model, dtype, temperature=10000.0):
    """DETR's normalised sine encoding of a (h, w) grid: [h*w, d_model] (y half, then x half)."""
    feats = d_model // 2
    y = (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2 * math.pi
    x = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 * math.pi
    dim_t = temperature ** (2 * (torch.arange(feats, dtype=torch.float64) // 2) / feats)
    py = y[:, None] / dim_t
    px = x[:, None] / dim_t
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], -1).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], -1).flatten(1)
    pos = torch.cat([py[:, None, :].expand(h, w, feats), px[None, :, :].expand(h, w, feats)], -1)
    return pos.reshape(h * w, d_model).to(dtype)


class FFN(nn.Module):
    def __init__(self, d_model, d_ffn):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.norm = LayerNorm(d_model)

    def forward(self, x):
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = DeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm = LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(self, src, pos, reference_points, shapes, starts):
        src = self.norm(src + self.self_attn(src + pos, reference_points, src, shapes, starts))
        return self.ffn(src)


class DecoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm1 = LayerNorm(d_model)
        self.cross_attn = DeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm2 = LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(self, tgt, query_pos, reference_points, memory, shapes, starts):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, tgt, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, reference_points, memory, shapes, starts))
        return self.ffn(tgt)


class MLP(nn.Module):
    def __init__(self, d_in, d_hidden, d_out, layers):
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class Detector(nn.Module):
    """Deformable DETR in miniature (single-scale queries, no iterative box refinement)."""

    def __init__(self, d_model=64, n_heads=8, n_points=4, n_levels=4, enc_layers=6, dec_layers=3, queries=20,
                 d_ffn=256, backbone_width=32):
        super().__init__()
        self.d_model, self.n_levels = d_model, n_levels
        self.backbone = Backbone(n_levels, backbone_width)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, 1), GroupNorm(8, d_model)) for c in self.backbone.channels)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model).normal_())
        self.encoder = nn.ModuleList(EncoderLayer(d_model, d_ffn, n_levels, n_heads, n_points)
                                     for _ in range(enc_layers))
        self.query_embed = nn.Embedding(queries, 2 * d_model)  # (query_pos, tgt), as Deformable DETR
        self.reference_points = nn.Linear(d_model, 2)
        self.decoder = nn.ModuleList(DecoderLayer(d_model, d_ffn, n_levels, n_heads, n_points)
                                     for _ in range(dec_layers))
        self.class_embed = nn.Linear(d_model, NUM_CLASSES + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        with torch.no_grad():
            self.bbox_embed.layers[-1].bias[2:] = -1.5  # start with boxes of about 0.2 x 0.2

    def attention_modules(self):
        return [m for m in self.modules() if isinstance(m, msda.MSDeformAttn)]

    def set_kernel(self, kernel):
        for m in self.attention_modules():
            m.kernel = kernel

    def forward(self, images):
        """images [N, 3, H, W] -> (logits [layers, N, Q, classes + 1], boxes [layers, N, Q, 4])."""
        feats = self.backbone(images)
        srcs, poss, refs, shapes = [], [], [], []
        for l, (feat, proj) in enumerate(zip(feats, self.input_proj)):
            src = proj(feat)
            n, c, h, w = src.shape
            shapes.append((h, w))
            srcs.append(src.flatten(2).transpose(1, 2))
            poss.append(sine_position(h, w, c, src.dtype).to(src.device) + self.level_embed[l].to(src.dtype))
            ys, xs = torch.meshgrid((torch.arange(h, dtype=images.dtype) + 0.5) / h,
                                    (torch.arange(w, dtype=images.dtype) + 0.5) / w, indexing="ij")
            refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        src = torch.cat(srcs, 1)
        pos = torch.cat(poss, 0)[None]
        n, s, _ = src.shape
        spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=src.device)
        areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
        starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
        # Encoder: every pixel is a query; its reference point is its own pixel centre, on every level.
        enc_ref = torch.cat(refs, 0).to(src.device)[None, :, None, :].expand(n, s, self.n_levels, 2)
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos, enc_ref, spatial_shapes, starts)
        # Decoder: learned queries, reference points from a Linear on the query embedding.
        query_pos, tgt = self.query_embed.weight.split(self.d_model, dim=1)
        query_pos = query_pos[None].expand(n, -1, -1)
        tgt = tgt[None].expand(n, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()
        dec_ref = reference[:, :, None, :].expand(-1, -1, self.n_levels, -1)
        logits, boxes = [], []
        for layer in self.decoder:
            tgt = layer(tgt, query_pos, dec_ref, memory, spatial_shapes, starts)
            delta = self.bbox_embed(tgt)
            centre = (delta[..., :2] + inverse_sigmoid(reference)).sigmoid()
            boxes.append(torch.cat([centre, delta[..., 2:].sigmoid()], -1))
            logits.append(self.class_embed(tgt))
        return torch.stack(logits), torch.stack(boxes)


def build_model(args):
    """The detector of the configuration in args (see parse_args), in args.dtype's parameter
    dtype (float64 for --dtype float64, else float32), kernel set to args.attention.
    Call torch.manual_seed(args.seed) first for reproducible weights."""
    model = Detector(d_model=args.d_model, n_heads=args.heads, n_points=args.points, n_levels=args.levels,
                     enc_layers=args.enc_layers, dec_layers=args.dec_layers, queries=args.queries,
                     d_ffn=4 * args.d_model, backbone_width=args.backbone_width)
    if args.dtype == "float64":
        model = model.double()
    model.set_kernel(args.attention)
    return model


# ----------------------------------------------------------------------------------------------
# Matching and loss


def box_cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_iou(a, b):
    """Pairwise GIoU of xyxy boxes a [A, 4] and b [B, 4]: [A, B]."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def hungarian(cost):
    """Exact minimum-cost assignment of a [R, C] cost matrix (a list of lists), R <= C: returns
    col[r] for every row (the shortest-augmenting-path Hungarian algorithm, O(R^2 C))."""
    rows, cols = len(cost), len(cost[0]) if cost else 0
    assert rows <= cols
    inf = float("inf")
    u, v = [0.0] * (rows + 1), [0.0] * (cols + 1)
    match = [0] * (cols + 1)  # match[j]: the row (1-based) holding column j, 0 if free
    way = [0] * (cols + 1)
    for i in range(1, rows + 1):
        match[0] = i
        j0 = 0
        minv = [inf] * (cols + 1)
        used = [False] * (cols + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, cols + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(cols + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    col = [0] * rows
    for j in range(1, cols + 1):
        if match[j]:
            col[match[j] - 1] = j - 1
    return col


try:
    from scipy.optimize import linear_sum_assignment as _scipy_lsa
except ImportError:  # scipy is optional
    _scipy_lsa = None


def assign(cost):
    """(query indices, target indices) of the minimum-cost matching of cost [Q, T], T <= Q."""
    if _scipy_lsa is not None:
        q, t = _scipy_lsa(cost.numpy())
        return torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)
    col = hungarian(cost.t().tolist())
    t = torch.arange(len(col))
    q = torch.tensor(col, dtype=torch.int64)
    order = q.argsort()
    return q[order], t[order]


COST_CLASS, COST_L1, COST_GIOU = 2.0, 5.0, 2.0
LOSS_L1, LOSS_GIOU, NO_OBJECT_WEIGHT = 5.0, 2.0, 0.1


@torch.no_grad()
def match(logits, boxes, target):
    """Hungarian matching of one image: logits [Q, C+1], boxes [Q, 4], target dict."""
    prob = logits.double().softmax(-1)
    tb = target["boxes"].double()
    cost = (COST_L1 * torch.cdist(boxes.double(), tb, p=1) - COST_CLASS * prob[:, target["labels"]]
            - COST_GIOU * generalized_iou(box_cxcywh_to_xyxy(boxes.double()), box_cxcywh_to_xyxy(tb)))
    return assign(cost)


def compute_loss(outputs, targets):
    """The loss of a batch: for every image and decoder layer, cross-entropy over all queries
    (no-object weight 0.1) + 5 x L1 + 2 x (1 - GIoU) over the matched queries, divided by the
    image's object count; summed over the layers and averaged over the images. Returns
    (loss, dict of its parts, each averaged the same way)."""
    logits_all, boxes_all = outputs
    logits_all = logits_all.float() if logits_all.dtype in (torch.bfloat16, torch.float16) else logits_all
    boxes_all = boxes_all.float() if boxes_all.dtype in (torch.bfloat16, torch.float16) else boxes_all
    layers, n, q, c = logits_all.shape
    class_weight = torch.ones(c, dtype=logits_all.dtype)
    class_weight[-1] = NO_OBJECT_WEIGHT
    parts = {"ce": 0.0, "l1": 0.0, "giou": 0.0}
    total = logits_all.new_zeros(())
    for layer in range(layers):
        for i, target in enumerate(targets):
            logits, boxes = logits_all[layer, i], boxes_all[layer, i]
            qi, ti = match(logits.detach(), boxes.detach(), target)
            classes = torch.full((q,), c - 1, dtype=torch.int64)
            classes[qi] = target["labels"][ti]
            ce = F.cross_entropy(logits, classes, weight=class_weight)
            count = len(ti)
            pb, tb = boxes[qi], target["boxes"][ti].to(boxes.dtype)
            l1 = (pb - tb).abs().sum() / count
            giou = (1 - torch.diag(generalized_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(tb)))).sum() / count
            total = total + ce + LOSS_L1 * l1 + LOSS_GIOU * giou
            parts["ce"] += float(ce) / n
            parts["l1"] += float(l1) / n
            parts["giou"] += float(giou) / n
    return total / n, parts


# ----------------------------------------------------------------------------------------------
# Training


def make_optimizer(model, lr):
    """AdamW; sampling offsets and reference points at a tenth of the rate (as Deformable DETR)."""
    slow, fast = [], []
    for name, p in model.named_parameters():
        (slow if "sampling_offsets" in name or "reference_points" in name else fast).append(p)
    return torch.optim.AdamW([{"params": fast, "lr": lr}, {"params": slow, "lr": lr * 0.1}], lr=lr, foreach=True,
                             weight_decay=1e-4)


def autocast_context(args):
    if args.dtype == "bfloat16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def data_dtype(args):
    return torch.float64 if args.dtype == "float64" else torch.float32


def forward_backward(model, images, targets, args):
    """One forward and backward; returns (loss, parts). Gradients accumulate into .grad."""
    with autocast_context(args):
        outputs = model(images)
    loss, parts = compute_loss(outputs, targets)
    loss.backward()
    return loss, parts


class Trainer:
    """A model and its optimizer for one attention path: torch.manual_seed(args.seed) runs first,
    so every Trainer of the same args.seed starts from the same weights."""

    def __init__(self, args, rank=0, world_size=1):
        if world_size > 1 and args.batch % world_size:
            raise SystemExit(f"--batch {args.batch} must be divisible by the world size {world_size}")
        self.args, self.rank, self.world_size = args, rank, world_size
        torch.manual_seed(args.seed)
        self.model = build_model(args)
        if world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = make_optimizer(self.model, args.lr)

    def batch(self, step):
        """This rank's shard of the global batch of a step."""
        images, targets = make_batch(step, self.args.batch, self.args.seed, self.args.image_size,
                                     data_dtype(self.args))
        return shard(images, targets, self.rank, self.world_size)

    def step(self, step, images, targets):
        """One optimisation step; returns its record {step, loss, step_time_s, attention, ce, l1, giou}
        (the loss averaged over the ranks), or None after --save-grads wrote the first gradients."""
        args = self.args
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = forward_backward(self.model, images, targets, args)
        if args.save_grads:
            save_gradients(self.model, loss, args.save_grads, self.rank, self.world_size)
            return None
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip)
        self.optimizer.step()
        elapsed = time.perf_counter() - start
        loss_value = float(loss)
        if self.world_size > 1:  # report the global means
            t = torch.tensor([loss_value] + [parts[k] for k in sorted(parts)], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            t /= self.world_size
            loss_value, parts = float(t[0]), dict(zip(sorted(parts), t[1:].tolist()))
        if not math.isfinite(loss_value):
            raise SystemExit(f"[{args.attention}] step {step}: the loss is {loss_value}")
        return {"step": step, "loss": loss_value, "step_time_s": elapsed, "attention": args.attention,
                **{k: round(v, 6) for k, v in parts.items()}}


def report(record, args, rank, log_file, quiet):
    if rank != 0:
        return
    if log_file is not None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    step = record["step"]
    if not quiet and (step % args.print_every == 0 or step == args.steps - 1):
        print(f"[{record['attention']}] step {step:4d}  loss {record['loss']:8.4f}  (ce {record['ce']:.3f} "
              f"l1 {record['l1']:.3f} giou {record['giou']:.3f})  {record['step_time_s'] * 1e3:7.1f} ms", flush=True)


def train(args, rank=0, world_size=1, log_file=None, quiet=False):
    """Trains for args.steps steps with args.attention; returns the list of per-step records
    {step, loss, step_time_s, ...}. With world_size > 1, torch.distributed must be initialised."""
    trainer = Trainer(args, rank, world_size)
    records = []
    for step in range(args.steps):
        record = trainer.step(step, *trainer.batch(step))
        if record is None:
            break
        records.append(record)
        report(record, args, rank, log_file, quiet)
    return records


def save_gradients(model, loss, path, rank, world_size):
    """Rank 0 writes {parameter name: gradient} (DDP's averaged gradients) and the loss to path."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if rank == 0:
        grads = {name: (p.grad.detach().clone() if p.grad is not None else None)
                 for name, p in inner.named_parameters()}
        torch.save({"grads": grads, "loss": float(loss), "world_size": world_size}, path)


def median_step_time(records, skip=2):
    times = [r["step_time_s"] for r in records[skip:]] or [r["step_time_s"] for r in records]
    return statistics.median(times)


def busy_cpu_seconds():
    """(CPU seconds all processes have used, CPU seconds this process has used), from /proc/stat
    (Linux; None elsewhere): their differences over a run tell how busy other processes kept the
    machine."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def compare(args, log_file=None):
    """The same seed with msda, pytorch and noop: median step times, ratios, loss agreement, plot.

    The three runs go in lockstep (step k of each, then step k + 1), so that whatever else the
    machine does slows all three alike. Returns (records per path, median step times, max |loss
    diff| msda vs pytorch, whether the curves agree)."""
    trainers = {a: Trainer(argparse.Namespace(**{**vars(args), "attention": a})) for a in ATTENTIONS}
    results = {a: [] for a in ATTENTIONS}
    cpu_before = busy_cpu_seconds()
    started = time.perf_counter()
    for step in range(args.steps):
        images, targets = trainers["msda"].batch(step)
        for a, trainer in trainers.items():
            record = trainer.step(step, images, targets)
            results[a].append(record)
            report(record, args, 0, log_file, quiet=True)
        if step % args.print_every == 0 or step == args.steps - 1:
            print(f"  step {step:4d}  " + "  ".join(f"{a} {results[a][-1]['loss']:8.4f} "
                                                   f"({results[a][-1]['step_time_s'] * 1e3:6.1f} ms)"
                                                   for a in ATTENTIONS), flush=True)
    elapsed = time.perf_counter() - started
    medians = {a: median_step_time(r) for a, r in results.items()}
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(results["msda"], results["pytorch"])]
    rel = [d / abs(a["loss"]) for d, a in zip(diffs, results["msda"])]
    print()
    print(f"{args.steps} steps of each in {elapsed:.1f} s; median step time over steps 2..{args.steps - 1}, "
          f"batch {args.batch}, {args.dtype}, {torch.get_num_threads()} threads")
    print("| attention | median step (s) | / noop |")
    print("|---|---:|---:|")
    for a in ATTENTIONS:
        print(f"| {a} | {medians[a]:.4f} | {medians[a] / medians['noop']:.2f} |")
    above = {a: medians[a] - medians["noop"] for a in ("msda", "pytorch")}
    line = f"msda's step is {medians['pytorch'] / medians['msda']:.2f}x faster than pytorch's"
    if above["msda"] > 0 and above["pytorch"] > 0:
        line += (f"; the attention's cost above the noop floor: msda {above['msda']:.4f} s, pytorch "
                 f"{above['pytorch']:.4f} s ({above['pytorch'] / above['msda']:.1f}x)")
    print(line)
    cpu_after = busy_cpu_seconds()
    if cpu_before and cpu_after:
        others = ((cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / elapsed
        if others > 0.2:
            print(f"note: other processes kept {others:.1f} of the {os.cpu_count()} cores busy on average "
                  "during the run: the step times are noisy")
    # msda follows SPEC (and Deformable DETR's CUDA kernel), grid_sample is the same operator up to
    # rounding, except that a sample exactly at column or row -1 (which Deformable DETR's
    # initialisation produces) has a zero gradient in msda and a non-zero one in grid_sample; the
    # training then amplifies these differences a little every step.
    tolerance = 1e-2 if args.dtype == "bfloat16" else 1e-3
    agree = max(rel) <= tolerance
    print(f"loss curves msda vs pytorch: step 0 |diff| {diffs[0]:.1e}; max |diff| {max(diffs):.3e} (relative "
          f"{max(rel):.3e}) over {len(diffs)} steps: {'agree' if agree else 'DISAGREE'} "
          f"(tolerance {tolerance:g} relative)")
    if args.plot:
        write_plot(results, medians, args)
        print(f"wrote {args.plot}")
    return results, medians, max(diffs), agree


def write_plot(results, medians, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [r["step"] for r in results["msda"]]
    ax.plot(steps, [r["loss"] for r in results["msda"]], "-", color="#1f77b4", lw=2.5, label="msda")
    ax.plot(steps, [r["loss"] for r in results["pytorch"]], "--", color="#ff7f0e", lw=1.5,
            label="pytorch (grid-sample)")
    ax.plot(steps, [r["loss"] for r in results["noop"]], ":", color="#999999", lw=1.2,
            label="noop (no sampling: a different model)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"loss, seed {args.seed}, batch {args.batch}, {args.dtype}")
    ax.legend()
    colours = {"msda": "#1f77b4", "pytorch": "#ff7f0e", "noop": "#999999"}
    for a in ATTENTIONS:
        ax_t.plot(steps, [r["step_time_s"] * 1e3 for r in results[a]], color=colours[a],
                  label=f"{a}: median {medians[a] * 1e3:.0f} ms")
    ax_t.set_xlabel("step")
    ax_t.set_ylabel("step time (ms)")
    ax_t.set_title(f"step time, {torch.get_num_threads()} threads")
    ax_t.set_ylim(bottom=0)
    ax_t.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    intro = __doc__[:__doc__.index("\nThe model is")]
    examples = __doc__[__doc__.index("Examples"):__doc__.index("(or, straight from a build")]
    parser = argparse.ArgumentParser(description=intro + "\nThe module docstring tells the rest: model, "
                                     "measurements, distributed training.", epilog=examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=ATTENTIONS, default="msda",
                        help="the MSDeformAttn path: msda's op, the grid-sample formulation, or a no-op in "
                             "place of the op (the floor)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default 300; 30 with --compare)")
    parser.add_argument("--batch", type=int, default=8, help="global batch size (split over the ranks with --ddp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the cores, divided among the ranks with --ddp)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="float32; bfloat16 (torch.autocast on the CPU, float32 weights); float64 (for tests)")
    parser.add_argument("--log", metavar="FILE", help="write one JSON line per step (step, loss, step_time_s, ...)")
    parser.add_argument("--compare", action="store_true",
                        help="run msda, pytorch and noop on the same seed; print step times and loss agreement")
    parser.add_argument("--plot", metavar="FILE", default="train_compare.png",
                        help="--compare's PNG of the loss curves and step times (default train_compare.png; "
                             "'' for none)")
    parser.add_argument("--ddp", action="store_true",
                        help="distributed data parallel (gloo); launch with torchrun --nproc_per_node=K")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    parser.add_argument("--print-every", type=int, default=10)
    model = parser.add_argument_group("model and data size")
    model.add_argument("--image-size", type=int, default=128)
    model.add_argument("--levels", type=int, choices=(3, 4), default=4, help="pyramid levels (strides 8..64)")
    model.add_argument("--d-model", type=int, default=64)
    model.add_argument("--heads", type=int, default=2,
                       help="attention heads; d_model / heads = 32 channels per head by default, the head size of "
                            "every published Deformable DETR-style model (and one msda compiles a kernel for)")
    model.add_argument("--points", type=int, default=4)
    model.add_argument("--enc-layers", type=int, default=6)
    model.add_argument("--dec-layers", type=int, default=3)
    model.add_argument("--queries", type=int, default=20)
    model.add_argument("--backbone-width", type=int, default=32)
    parser.add_argument("--save-grads", metavar="FILE",
                        help="(testing) after the first step's backward, save rank 0's gradients and stop")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 30 if args.compare else 300
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1")
    if args.compare and args.ddp:
        parser.error("--compare runs in one process; leave out --ddp")
    if args.image_size % 64:
        parser.error(f"--image-size must be a multiple of 64, got {args.image_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world_size = 0, 1
    if args.ddp:
        if "RANK" not in os.environ:
            raise SystemExit("--ddp: launch with torchrun --nproc_per_node=K (or python -m torch.distributed.run)")
        if os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.distributed.init_process_group("gloo")
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        threads = args.threads or max(1, (os.cpu_count() or 1) // local)
    else:
        threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if rank == 0:
        print(f"train_detector: attention {'msda, pytorch, noop' if args.compare else args.attention}, "
              f"{args.steps} steps, batch {args.batch}"
              + (f" ({args.batch // world_size} per rank, {world_size} ranks)" if world_size > 1 else "")
              + f", {args.dtype}, {threads} threads, image {args.image_size}, d_model {args.d_model}", flush=True)
    log_file = open(args.log, "w") if args.log and rank == 0 else None
    try:
        if args.compare:
            _, _, _, agree = compare(args, log_file)
            status = 0 if agree else 1
        else:
            started = time.perf_counter()
            records = train(args, rank, world_size, log_file)
            if rank == 0 and records:
                print(f"done: {len(records)} steps in {time.perf_counter() - started:.1f} s, loss "
                      f"{records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, median step "
                      f"{median_step_time(records):.4f} s")
            if args.ddp:
                # Every rank done before any tears gloo down: a rank that left while another was
                # still communicating aborted ("terminate called without an active exception"),
                # once in a dozen runs on a loaded 2-core machine.
                torch.distributed.barrier()
            status = 0
    finally:
        if log_file is not None:
            log_file.close()
        if args.ddp:
            torch.distributed.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
