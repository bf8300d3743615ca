#!/usr/bin/env bash
# `pip wheel .` makes a wheel, which installs into an empty folder and works from anywhere: the
# op against the grid-sample path, and torch.compile through it.
# Usage: wheel.sh PYTHON WORK_DIR   (PYTHON: an environment with torch and scikit-build-core)
set -euo pipefail
python=$1 work=$2
repo=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf "$work" && mkdir -p "$work"
# --no-build-isolation: build with this environment's scikit-build-core, quickly and offline
# (a plain `pip wheel .` works too; scripts/setup.sh uses the isolated build).
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheelhouse" "$repo"
wheel=$(ls "$work"/wheelhouse/msda-*.whl)
echo "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"
"$python" -m pip install -q --no-deps --target "$work/site" "$wheel"
cd "$work"
PYTHONPATH="$work/site" "$python" - <<'PY'
import torch, msda
assert msda.__file__.startswith(__import__("os").getcwd()), msda.__file__  # the wheel's, not the tree's
shapes = torch.tensor([[6, 7], [3, 4]])
starts = torch.tensor([0, 42])
g = torch.Generator().manual_seed(0)
value = torch.randn(2, 54, 2, 8, generator=g, dtype=torch.float64)
loc = torch.rand(2, 10, 2, 2, 3, 2, generator=g, dtype=torch.float64)
w = torch.rand(2, 10, 2, 2, 3, generator=g, dtype=torch.float64)
out = msda.ms_deform_attn(value, shapes, starts, loc, w)
ref = msda.ms_deform_attn_pytorch(value, shapes, loc, w)
err = ((out - ref).norm() / ref.norm()).item()
assert err < 1e-12, err
compiled = torch.compile(lambda *a: msda.ms_deform_attn(*a) * 2, fullgraph=True, backend="eager")
assert torch.equal(compiled(value, shapes, starts, loc, w), out * 2)
print(f"PASS: msda {msda.__version__} from the wheel, torch {torch.__version__}, error vs grid-sample {err:.1e}")
PY
