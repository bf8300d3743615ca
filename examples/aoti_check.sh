#!/usr/bin/env bash
# The CI test of C++ serving without Python (ctest -R aoti_package): examples/aoti_export.py
# compiles a model with msda's ops into an AOTInductor package, then msda_aoti_run runs it from
# libtorch, no Python, and compares with the eager outputs.
# Usage: aoti_check.sh PYTHON MSDA_AOTI_RUN WORK_DIR   (PYTHONPATH: where msda is, e.g. build/python)
set -euo pipefail
python=$1 runner=$2 work=$3
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work" && mkdir -p "$work"
started=$SECONDS
# AOTInductor's compile cache goes into the work folder, so each run compiles from scratch.
TORCHINDUCTOR_CACHE_DIR="$work/inductor-cache" "$python" "$here/aoti_export.py" "$work"
exported=$SECONDS
# The C++ program must not need Python: run it without PYTHONPATH.
env -u PYTHONPATH "$runner" "$work"
echo "aoti_check: export and compile $((exported - started)) s, C++ run $((SECONDS - exported)) s"
