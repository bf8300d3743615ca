#!/usr/bin/env bash
# On a fresh Debian 12 machine: install what is missing, build, install the Python package for
# /usr/bin/python3, and run the main job: python -m msda.bench, msda against the grid-sample path
# on every named workload. Arguments go to msda.bench (try --help; --quick for a run of seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
$sudo cmake --install build >/dev/null
echo "msda: Python package installed for /usr/bin/python3 ($(cd /tmp && /usr/bin/python3 -c 'import msda, os; print(os.path.dirname(msda.__file__))'))"
/usr/bin/python3 -m msda.bench "$@"
