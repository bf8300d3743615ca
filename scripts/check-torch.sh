#!/usr/bin/env bash
# Checks msda against another torch release: makes build-torch-VERSION/venv with that torch from
# PyPI (plus pytest, numpy, scipy), `pip install .` msda into it (an isolated build, as a user's
# would be) and runs the Python test suite there, from outside the source tree's python/.
# Not part of CI (a CUDA build of torch is several GB); README lists the releases checked.
# Usage: scripts/check-torch.sh 2.4.1 [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/check-torch.sh TORCH_VERSION [pytest args]}
shift
dir=build-torch-$version
[[ -x $dir/venv/bin/python ]] || python3 -m venv "$dir/venv"
numpy=numpy
# torch before 2.5 was built against NumPy 1.x.
[[ $(printf '%s\n' "$version" 2.5 | sort -V | head -n 1) != 2.5 ]] && numpy="numpy<2"
"$dir/venv/bin/python" -m pip install -q "torch==$version" pytest "$numpy" scipy
"$dir/venv/bin/python" -m pip install -q --no-deps --force-reinstall .
"$dir/venv/bin/python" -c 'import torch, msda; print(f"msda {msda.__version__} with torch {torch.__version__}")'
exec "$dir/venv/bin/python" -m pytest -q -p no:cacheprovider tests/python "$@"
