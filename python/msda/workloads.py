"""SPEC's named workloads and the inputs SPEC draws for them (mirrors workloads/ in C++)."""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

LOCATION_KINDS = ("encoder", "decoder", "random")


@dataclass
class Workload:
    name: str
    model: str
    batch: int                      # N
    levels: List[Tuple[int, int]]   # (H, W) per level
    queries: Optional[int]          # Q; None = S (an encoder: every pixel is a query)
    points: int = 4                 # P
    heads: int = 8                  # M
    channels: int = 32              # D
    locations: str = "decoder"      # how sampling locations are drawn
    extra: dict = field(default_factory=dict)
    # The v2 attention (SPEC "Points per level and discrete sampling"): points per level (None:
    # `points` on every level, the plain op's [N, Q, M, L, P, ...] layout) and the sampling.
    point_list: Optional[List[int]] = None
    sampling: str = "bilinear"

    @property
    def v2(self) -> bool:
        return self.point_list is not None or self.sampling != "bilinear"

    @property
    def level_points(self) -> List[int]:
        return list(self.point_list) if self.point_list is not None else [self.points] * len(self.levels)

    @property
    def value_len(self) -> int:
        return sum(h * w for h, w in self.levels)

    @property
    def num_queries(self) -> int:
        return self.value_len if self.queries is None else self.queries

    def describe(self) -> str:
        levels = " ".join(f"{h}x{w}" for h, w in self.levels)
        points = self.points if self.point_list is None else "[" + ",".join(map(str, self.point_list)) + "]"
        sampling = "" if self.sampling == "bilinear" else f" {self.sampling}"
        return (f"N={self.batch} Q={self.num_queries} M={self.heads} D={self.channels} P={points}{sampling} "
                f"levels {levels}")


_DDETR = [(100, 134), (50, 67), (25, 34), (13, 17)]
NAMED = [
    Workload("ddetr-enc", "Deformable DETR encoder, 800x1066", 1, _DDETR, None, locations="encoder"),
    Workload("ddetr-dec", "Deformable DETR decoder", 1, _DDETR, 300),
    Workload("dino-dec", "DINO / Grounding DINO decoder", 1, _DDETR, 900),
    Workload("m2f-enc", "Mask2Former pixel decoder, 1024x1024", 1, [(128, 128), (64, 64), (32, 32)], None,
             locations="encoder"),
    Workload("rtdetr-dec", "RT-DETR decoder, 640x640", 1, [(80, 80), (40, 40), (20, 20)], 300),
    Workload("bev-tsa", "BEVFormer temporal self-attention", 2, [(200, 200)], None, locations="encoder"),
    Workload("bev-sca", "BEVFormer spatial cross-attention, 6 cameras", 6,
             [(116, 200), (58, 100), (29, 50), (15, 25)], 2500, points=8),
    Workload("dfine-dec", "D-FINE / DEIM decoder, 640x640 (points per level)", 1, [(80, 80), (40, 40), (20, 20)],
             300, point_list=[3, 6, 3]),
    Workload("rtdetrv2-dec", "RT-DETRv2 decoder, 640x640 (v2 layout)", 1, [(80, 80), (40, 40), (20, 20)], 300,
             point_list=[4, 4, 4]),
    Workload("rtdetrv2-dec-discrete", "RT-DETRv2 decoder, 640x640, discrete sampling", 1,
             [(80, 80), (40, 40), (20, 20)], 300, point_list=[4, 4, 4], sampling="discrete"),
]


def find(name: str) -> Workload:
    for w in NAMED:
        if w.name == name:
            return w
    raise ValueError(f"workload: expected one of {', '.join(w.name for w in NAMED)}, got {name!r}")


def parse_shape(text: str) -> Workload:
    """A custom workload: 'N=1,Q=1000,M=8,D=32,P=4,levels=64x64+32x32,locations=random[,name=x]'."""
    fields = dict(item.split("=", 1) for item in text.replace(" ", "").split(",") if item)
    try:
        levels = [tuple(int(v) for v in level.split("x")) for level in fields.pop("levels").split("+")]
    except KeyError:
        raise ValueError(f"shape {text!r}: expected levels=HxW+HxW...") from None
    locations = fields.pop("locations", "random")
    if locations not in LOCATION_KINDS:
        raise ValueError(f"shape {text!r}: locations: expected one of {LOCATION_KINDS}, got {locations!r}")
    name = fields.pop("name", "custom")
    sizes = {k: int(v) for k, v in fields.items()}
    unknown = set(sizes) - {"N", "Q", "M", "D", "P"}
    if unknown:
        raise ValueError(f"shape {text!r}: unknown fields {sorted(unknown)} (expected N, Q, M, D, P)")
    return Workload(name, "custom", sizes.get("N", 1), levels, sizes.get("Q"), points=sizes.get("P", 4),
                    heads=sizes.get("M", 8), channels=sizes.get("D", 32), locations=locations)


def spatial_tensors(levels):
    shapes = torch.tensor(levels, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return shapes, starts


def generate(w: Workload, locations: Optional[str] = None, dtype=torch.float32, seed: int = 0):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) as SPEC
    draws them: value standard normal; encoder queries sit on their own pixel centre, decoder
    reference points are uniform, both plus offsets uniform in [-4, 4] pixels of each level;
    random locations are uniform in [0, 1]^2; weights a softmax over L*P of normal logits.
    Locations and weights are float32 (float64 when dtype is float64)."""
    kind = locations or w.locations
    if kind not in LOCATION_KINDS:
        raise ValueError(f"locations: expected one of {LOCATION_KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    if w.point_list is not None:
        return _generate_v2(w, kind, dtype, g)
    n, q, m, d, p, L = w.batch, w.num_queries, w.heads, w.channels, w.points, len(w.levels)
    coord_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes, starts = spatial_tensors(w.levels)
    value = torch.randn(n, w.value_len, m, d, generator=g).to(dtype)
    hw = shapes.to(torch.float64)
    wh = torch.stack([hw[:, 1], hw[:, 0]], -1)  # (W, H) per level
    if kind == "random":
        loc = torch.rand(n, q, m, L, p, 2, generator=g, dtype=torch.float64)
    else:
        if kind == "encoder":
            centres = []
            for h, wd in w.levels:
                ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(wd, dtype=torch.float64),
                                        indexing="ij")
                centres.append(torch.stack([(xs.flatten() + 0.5) / wd, (ys.flatten() + 0.5) / h], -1))
            centres = torch.cat(centres)
            ref = centres[torch.arange(q) % w.value_len].expand(n, q, 2)
        else:
            ref = torch.rand(n, q, 2, generator=g, dtype=torch.float64)
        offsets = (torch.rand(n, q, m, L, p, 2, generator=g, dtype=torch.float64) * 8 - 4) / wh[:, None, :]
        loc = ref[:, :, None, None, None, :] + offsets
    logits = torch.randn(n, q, m, L * p, generator=g, dtype=torch.float64)
    weights = logits.softmax(-1).view(n, q, m, L, p)
    return value, shapes, starts, loc.to(coord_dtype), weights.to(coord_dtype)


def _generate_v2(w: Workload, kind: str, dtype, g):
    """generate() for a workload with points per level: the same draws level by level, laid out
    [N, Q, M, K, 2] and [N, Q, M, K] (K = the sum of the points), one softmax over K."""
    n, q, m, d, K = w.batch, w.num_queries, w.heads, w.channels, sum(w.level_points)
    coord_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes, starts = spatial_tensors(w.levels)
    value = torch.randn(n, w.value_len, m, d, generator=g).to(dtype)
    if kind == "random":
        loc = torch.rand(n, q, m, K, 2, generator=g, dtype=torch.float64)
    else:
        if kind == "encoder":
            raise ValueError("locations: the v2 workloads are decoders (decoder or random locations)")
        ref = torch.rand(n, q, 2, generator=g, dtype=torch.float64)
        per_level = []
        for (h, wd), p in zip(w.levels, w.level_points):
            offsets = (torch.rand(n, q, m, p, 2, generator=g, dtype=torch.float64) * 8 - 4)
            per_level.append(ref[:, :, None, None, :] + offsets / torch.tensor([wd, h], dtype=torch.float64))
        loc = torch.cat(per_level, dim=3)
    weights = torch.randn(n, q, m, K, generator=g, dtype=torch.float64).softmax(-1)
    return value, shapes, starts, loc.to(coord_dtype), weights.to(coord_dtype)
