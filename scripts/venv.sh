#!/usr/bin/env bash
# Makes the project's Python environment at .venv (ignored by git) with the python3 on PATH and
# installs requirements-dev.txt into it: PyTorch from PyPI (a CUDA build of several GB, which
# also runs on the CPU; pip's cache makes later installs quick), transformers, pytest, ...
# Idempotent: an environment that has everything is left as it is (no network needed).
# MSDA_PYTHON=/path/to/python: use that environment instead (it must have torch >= 2.4); nothing
# is installed into it but what requirements-dev.txt lists and it lacks.
# Prints the interpreter's path as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${MSDA_PYTHON:-.venv/bin/python}
if [[ -z ${MSDA_PYTHON:-} && ! -x $python ]]; then
  echo "msda: making the virtual environment .venv with $(command -v python3) ($(python3 --version))" >&2
  python3 -m venv .venv
fi
if ! "$python" - requirements-dev.txt >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, wanted = line.partition("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    # A user's own environment (MSDA_PYTHON) may have other versions; .venv gets the pinned ones.
    import os
    if not os.environ.get("MSDA_PYTHON") and have.split("+")[0] != wanted:
        sys.exit(1)
PY
then
  echo "msda: installing requirements-dev.txt into $python (torch is several GB the first time)" >&2
  started=$SECONDS
  if [[ -n ${MSDA_PYTHON:-} ]]; then
    # Keep the user's torch: install only what is missing.
    "$python" -m pip install -q --upgrade-strategy only-if-needed $(grep -Eo '^[A-Za-z0-9_.-]+' requirements-dev.txt) >&2
  else
    "$python" -m pip install -q --upgrade pip >&2
    "$python" -m pip install -q -r requirements-dev.txt >&2
  fi
  echo "msda: installed in $((SECONDS - started)) s" >&2
fi
echo "$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
