#!/usr/bin/env python3
"""Writes fuzz/corpus/: small seed inputs for fuzz_msda, one per situation worth starting from.

The byte layout is fuzz_msda.cpp's (see its header and decode_problem / fuzz_problem /
fuzz_describe); every seed stops after its header, so the harness's pseudo-random continuation
(seeded by the input) fills the tensors. Run: python3 fuzz/make_seeds.py [output dir]
"""
import os
import sys

F32, F64, BF16, F16 = 0, 1, 2, 3


def n_byte(n):  # N = b % 4
    return n


def q_byte(q):  # Q = b % 21
    return q


def m_byte(m):  # M = 1 + b % 4
    return m - 1


def d_byte(d):  # D = 32 if b < 64 else 1 + b % 40
    return 0 if d == 32 else next(b for b in range(64, 256) if 1 + b % 40 == d)


def p_byte(p):  # P = 1 + b % 5
    return p - 1


def l_byte(l):  # L = 1 + b % 4
    return l - 1


def dim_byte(x):  # b < 160: 1 + b % 5; b < 244: 1 + b % 12; else a table of odd sizes
    if 1 <= x <= 5:
        return x - 1
    if 1 <= x <= 12:
        return next(b for b in range(160, 244) if 1 + b % 12 == x)
    odd = {0: 244, -1: 245, -7: 246, 16: 252, 13: 253}
    return odd[x]


def dtype_byte(value, location=None, weight=None, any_mix=False):
    """Legal mixes: location and weight are value's dtype or f32."""
    location = value if location is None else location
    weight = value if weight is None else weight
    if any_mix:
        return 0xC0 | (weight << 4) | (location << 2) | value
    b = value
    if location != value:
        assert location == F32
        b |= 4
    if weight != value:
        assert weight == F32
        b |= 8
    return b


# offset_scale bytes (decode_offset_scale): 0.5 below 160; kFinite[b % 16] below 232; else not finite.
SCALE = {0.5: 0, 0.25: 160, 0.75: 161, 1.0: 162, 0.3: 163, 2.0: 164, -0.5: 165, "nan": 232, "inf": 233}


def v2_bytes(fused=False, discrete=False, points=None, coords=4, reference_f32=False, scale=0.5):
    """decode_v2's fields: plain or fused, the sampling, the points per level (None: equal points,
    `points` on every level; a list: P_l in 1..6), and for the fused op the reference points'
    coordinates (2 or 4) and dtype (value's, or f32) and offset_scale (a key of SCALE)."""
    mode = 0 if points is None else 2
    out = [int(fused) | (int(discrete) << 1) | (mode << 2)]
    if points is not None:
        out += [x - 1 for x in points]  # P_l = 1 + b % 6
    if fused:
        out += [(0 if coords == 4 else 4) | (8 if reference_f32 else 0), SCALE[scale]]
    return out


def problem(n=1, q=4, m=2, d=32, p=3, levels=((3, 4), (2, 2)), dtypes=(F32,), any_mix=False,
            corrupt=None, level=0, threads=(1, 2), tuning=0, bad=0, grads=7, nonfinite=False,
            rates=(0, 0, 0, 0), mode=0, v2=None):
    """mode: byte 0 (anything but 7 mod 8 fuzzes a problem). corrupt: decode_problem's case number
    (0..29), applied to level `level`. threads: (first, second) in 1..4. tuning: bit 0 staging copy
    (else bit 6: direct, else automatic), bit 1 level_parts, bits 2-3 the query_block choice,
    bits 4-5 the scatter (automatic, copy, in_place, automatic). bad: >= 224 makes a bad call. grads: mask of the gradients the cpu backend is asked for (1 value, 2 locations, 4 weights; fused:
    1 value, 2 reference_points, 4 sampling_offsets, 8 attention_logits). rates:
    special-value rates of locations, weights, value, grad_output (0 none .. 3 one in two).
    v2: None, or v2_bytes()'s keywords (a corruption byte in [160, 224) announces them)."""
    out = [mode, n_byte(n), q_byte(q), m_byte(m), d_byte(d), p_byte(p), l_byte(len(levels))]
    for h, w in levels:
        out += [dim_byte(h), dim_byte(w)]
    out.append(dtype_byte(*dtypes, any_mix=any_mix))
    if v2 is not None:
        out += [160] + v2_bytes(**v2)
    if corrupt is None:
        out.append(0)
    else:
        out += [224 + corrupt, level]
    ob = (threads[0] - 1) | ((threads[1] - 1) << 2)
    vb = (grads << 4) | (0x0F if nonfinite else 0)
    rb = rates[0] | (rates[1] << 2) | (rates[2] << 4) | (rates[3] << 6)
    out += [ob, tuning, bad, vb, rb]
    return bytes(out)


def describe(changes=(), same_dtypes=True, **kw):
    """describe() fuzzing: a problem's sizes, then `changes` as (tensor 0..4, how, size bytes...)."""
    head = problem(mode=7, **kw)[:-5]  # the problem's bytes only
    out = list(head) + [len(changes)]
    for change in changes:
        out += list(change)
    out.append(0 if same_dtypes else 200)
    out.append(0)  # spatial_shapes contents unchanged
    return bytes(out)


SEEDS = {
    "f32-basic": problem(),
    "f64-rare-specials": problem(dtypes=(F64,), rates=(1, 1, 1, 1), threads=(2, 3)),
    "bf16-value-f32-samples": problem(dtypes=(BF16, F32, F32), q=9, d=20, levels=((4, 4), (2, 3), (1, 1))),
    "f16-all": problem(dtypes=(F16,), levels=((5, 3),), p=5),
    "f16-value-f32-locations": problem(dtypes=(F16, F32, F16), m=3, d=7, tuning=1),
    "f32-many-specials": problem(rates=(3, 3, 2, 2), q=12, levels=((12, 12),)),
    "f64-nonfinite-values": problem(dtypes=(F64,), nonfinite=True, rates=(2, 2, 2, 2)),
    "empty-batch": problem(n=0, q=5),
    "no-queries": problem(n=2, q=0, levels=((3, 3), (2, 2))),
    "bad-level-start": problem(corrupt=0, level=1),
    "bad-dtype-mix": problem(dtypes=(F32, F64, BF16), any_mix=True),
    "huge-queries-empty-batch": problem(corrupt=15),
    "bad-call": problem(bad=0xF0, q=3),
    "workload-like": problem(n=1, q=20, m=4, d=32, p=4, levels=((12, 12), (6, 8), (3, 4), (2, 2)),
                             threads=(4, 3), tuning=0b1110),
    "level-parts-locations-only": problem(n=1, m=1, tuning=2, grads=2, threads=(3, 1)),
    "value-grad-only-f64": problem(dtypes=(F64, F32, F64), grads=1, threads=(2, 4)),
    "zero-height-level": problem(levels=((0, 3), (2, 2))),
    "zero-heads": problem(corrupt=8),
    "describe-consistent": describe(dtypes=(BF16, F32, F32)),
    # sampling_locations[4] = -2; value gets rank 5
    "describe-changed-sizes": describe(changes=((3, 70, 201), (0, 5, 3, 1, 2, 3, 4)), same_dtypes=False),
    # The v2 attention (SPEC "Points per level and discrete sampling"), discrete, with f64
    # locations (some at pixel centres: x*W + 0.5 on an integer up to rounding, an ambiguous pixel).
    "v2-discrete-points-f64": problem(dtypes=(F64,), q=6, levels=((12, 12), (6, 6), (3, 3)), rates=(1, 0, 0, 0),
                                      v2=dict(discrete=True, points=[3, 6, 3]), threads=(2, 3)),
    # The fused op with boxes, D-FINE's points [3, 6, 3] and another offset_scale, every gradient.
    "v2-fused-boxes-points": problem(q=8, m=2, d=8, levels=((12, 12), (6, 6), (3, 3)), grads=15,
                                     v2=dict(fused=True, points=[3, 6, 3], scale=0.75), threads=(3, 1)),
    # The fused op, discrete (RT-DETRv2), 2 coordinates, bf16 value with f32 reference points.
    "v2-fused-discrete-bf16": problem(dtypes=(BF16, F32, F32), q=5, d=7, grads=15, tuning=2,
                                      v2=dict(fused=True, discrete=True, coords=2, reference_f32=True)),
    # A non-finite offset_scale with boxes: an msda::Error naming offset_scale.
    "v2-fused-nan-offset-scale": problem(v2=dict(fused=True, scale="nan")),
}


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    os.makedirs(out_dir, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    print(f"{len(SEEDS)} seeds in {out_dir}")


if __name__ == "__main__":
    main()
