#!/usr/bin/env bash
# On a fresh Debian 12 machine: install the Debian packages msda needs, make the virtual
# environment .venv with PyTorch from PyPI (scripts/venv.sh), `pip install .` msda into it, and
# run the main job: .venv/bin/python -m msda.bench, msda against the grid-sample path (and
# transformers' own MSDA) on every named workload. Arguments go to msda.bench (try --help;
# --quick for a run of seconds). MSDA_PYTHON=/path/to/python uses that environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
scripts/install-deps.sh
python=$(scripts/venv.sh | tail -n 1)
echo "msda: pip install . into $python"
"$python" -m pip install -q --no-deps --force-reinstall .
echo "msda: installed ($(cd /tmp && "$python" -c 'import msda, torch; print(f"msda {msda.__version__} for torch {torch.__version__} in {msda.__path__[0]}")')); setup took $((SECONDS - started)) s"
"$python" -m msda.bench "$@"
