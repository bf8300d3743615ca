#!/usr/bin/env bash
# On a fresh Debian 12 machine: install the Debian packages msda needs, make the virtual
# environment .venv with PyTorch from PyPI (scripts/venv.sh), build msda once into build/
# (scripts/build.sh: the library, the PyTorch op, the tests, benchmarks and examples) and make
# .venv import it from there, then run the main job: .venv/bin/python -m msda.bench, msda against
# the grid-sample path (and transformers' own MSDA) on every named workload. Arguments go to
# msda.bench (try --help; --quick for a run of seconds).
#
# One build serves the main job and scripts/test.sh, which then only rebuilds what changed.
# .venv sees build/python through a .pth file (a rebuild updates what it imports); `pip install .`
# is what a user's own environment takes (MSDA_PYTHON=/path/to/python: that environment, into
# which msda is pip-installed as before), and CI checks it (scripts/packaging-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
scripts/install-deps.sh
python=$(scripts/venv.sh | tail -n 1)
if [[ -n ${MSDA_PYTHON:-} ]]; then
  echo "msda: pip install . into $python"
  "$python" -m pip install -q --no-deps --force-reinstall .
else
  echo "msda: building into build/ (scripts/build.sh)"
  scripts/build.sh
  # An msda pip-installed into .venv earlier would shadow the build tree: site-packages comes first.
  "$python" -m pip uninstall -q -y msda >/dev/null 2>&1 || true
  site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$PWD/build/python" > "$site/msda-build-tree.pth"
fi
echo "msda: ready ($(cd /tmp && "$python" -c 'import msda, torch; print(f"msda {msda.__version__} for torch {torch.__version__} in {msda.__path__[0]}")')); setup took $((SECONDS - started)) s"
"$python" -m msda.bench "$@"
